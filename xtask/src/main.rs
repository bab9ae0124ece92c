//! `cargo xtask`: set-up, tests, lint and demo for xlb — what plain cargo cannot do alone.
//!
//! Depends on no workspace crate: it must run before the eBPF toolchain exists.

mod exec;
mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// The eBPF crate: built by lb-userspace's build script, linted separately (a host build fails).
const EBPF_CRATE: &str = "lb-ebpf";

/// xlb developer tasks.
#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "xlb developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// The tasks.
#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites: apt packages (BIRD 2 included, its own service kept off),
    /// nightly + rust-src, bpf-linker, bpffs.
    Setup,
    /// Set up, build the xlb binary, run every test tier (`cargo xtask test -- FILTER` filters).
    Test {
        /// Arguments for the test harness, after `--` (a name filter, `--nocapture`, ...).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// rustfmt check, clippy on the workspace, clippy on the eBPF crate (all with -D warnings).
    Lint,
    /// Set up, build, and run the demo in network namespaces.
    Demo {
        /// Arguments for the demo binary, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the benchmarks; writes target/bench/report.{md,json} and plots.
    Bench {
        /// Keep the whole run under two minutes (for development).
        #[arg(long)]
        quick: bool,
        /// Arguments for the bench binary, after `--` (e.g. `--out DIR`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::setup(),
        Task::Test { args } => test(&args),
        Task::Lint => lint(),
        Task::Demo { args } => demo(&args),
        Task::Bench { quick, args } => bench(quick, &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

/// A `cargo` command run from the workspace root.
fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new("cargo");
    c.args(args).current_dir(root());
    c
}

/// A banner line that says which phase runs.
fn banner(text: &str) {
    println!("\n==> {text}");
}

/// Workspace metadata: the target directory and the integration-test targets.
struct Workspace {
    target_dir: PathBuf,
    /// (package, test target name, source path) of every `tests/*.rs`-style target.
    integration: Vec<(String, String, String)>,
}

/// Reads `cargo metadata` for the target directory and integration-test targets.
fn workspace() -> Result<Workspace> {
    let out = exec::capture(&mut cargo(&[
        "metadata",
        "--no-deps",
        "--format-version",
        "1",
    ]))?;
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let target_dir = meta["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?
        .into();
    let mut integration = Vec::new();
    for pkg in meta["packages"].as_array().into_iter().flatten() {
        let pkg_name = pkg["name"].as_str().unwrap_or_default();
        if pkg_name == EBPF_CRATE {
            continue;
        }
        for t in pkg["targets"].as_array().into_iter().flatten() {
            let is_test = t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
            if is_test {
                let name = t["name"].as_str().unwrap_or_default();
                let path = t["src_path"].as_str().unwrap_or_default();
                let rel = Path::new(path)
                    .strip_prefix(root())
                    .map_or_else(|_| path.to_owned(), |p| p.display().to_string());
                integration.push((pkg_name.to_owned(), name.to_owned(), rel));
            }
        }
    }
    // Namespace end-to-end tests are the slowest: run them last.
    integration.sort_by_key(|(_, name, _)| name.contains("e2e"));
    Ok(Workspace {
        target_dir,
        integration,
    })
}

/// Builds the release xlb binary (with the eBPF program embedded) and returns its path.
fn build_xlb(ws: &Workspace) -> Result<PathBuf> {
    banner("build: xlb (release, eBPF program embedded by lb-userspace/build.rs)");
    exec::live(&mut cargo(&["build", "--release", "-p", "lb-userspace"]))?;
    let bin = ws.target_dir.join("release").join("xlb");
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// `cargo xtask test`: setup, release build, then each test tier; non-zero exit if any fails.
fn test(harness_args: &[String]) -> Result<()> {
    banner("setup");
    setup::setup()?;
    let ws = workspace()?;
    let xlb = build_xlb(&ws)?;
    let xlb = xlb.display().to_string();
    println!("XLB_BIN={xlb}");

    // Tests share kernel state (namespaces, pins, XDP attachments): one at a time.
    let mut tail: Vec<&str> = vec!["--", "--test-threads=1"];
    tail.extend(harness_args.iter().map(String::as_str));
    let base = ["test", "--release", "--workspace", "--exclude", EBPF_CRATE];

    let mut tiers: Vec<(String, Vec<String>)> = vec![
        (
            "tier 1: unit tests (lib and bin targets of every crate but lb-ebpf)".into(),
            ["--lib", "--bins"].map(String::from).to_vec(),
        ),
        ("tier 1: doc tests".into(), vec!["--doc".into()]),
    ];
    for (pkg, name, path) in &ws.integration {
        // Told apart by name only: targets named *e2e* drive real traffic through network
        // namespaces, the others (fixtures) run the program through BPF_PROG_TEST_RUN.
        let tier = if name.contains("e2e") {
            "tier 3: end-to-end in network namespaces"
        } else {
            "tier 2: integration"
        };
        tiers.push((
            format!("{tier}: {path} ({pkg} --test {name})"),
            vec!["--test".into(), name.clone()],
        ));
    }

    let mut failed = Vec::new();
    let mut counts = exec::Counts::default();
    for (label, selector) in &tiers {
        banner(label);
        // An integration target belongs to one package; selecting it workspace-wide is fine.
        let mut c = cargo(&base);
        c.args(selector).args(&tail).env("XLB_BIN", &xlb);
        let (stderr_tail, status, tier_counts) = exec::live_tests(&mut c)?;
        counts.passed += tier_counts.passed;
        counts.failed += tier_counts.failed;
        counts.ignored += tier_counts.ignored;
        if !status.success() {
            eprintln!("FAILED: {label} ({status}); last stderr lines:\n{stderr_tail}");
            failed.push(label.clone());
        }
    }

    banner("summary");
    for (label, _) in &tiers {
        let verdict = if failed.contains(label) {
            "FAILED"
        } else {
            "ok"
        };
        println!("{verdict:>6}  {label}");
    }
    // The plain closing line CI reads, over every tier.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.ignored
    );
    if !failed.is_empty() {
        bail!("{} of {} test tiers failed", failed.len(), tiers.len());
    }
    Ok(())
}

/// `cargo xtask lint`: fmt, workspace clippy, eBPF clippy; runs all three and fails if any did.
fn lint() -> Result<()> {
    banner("setup");
    setup::setup()?;
    let ebpf_dir = root().join(EBPF_CRATE);
    let mut checks: Vec<(&str, Command)> = vec![
        (
            "lint 1/3: rustfmt",
            cargo(&["fmt", "--all", "--", "--check"]),
        ),
        (
            "lint 2/3: clippy (workspace, all targets, host)",
            cargo(&[
                "clippy",
                "--workspace",
                "--exclude",
                EBPF_CRATE,
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        ),
    ];
    let mut ebpf = Command::new("cargo");
    ebpf.args([
        "+nightly",
        "clippy",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ])
    .current_dir(&ebpf_dir);
    checks.push((
        "lint 3/3: clippy (eBPF crate, nightly, bpfel-unknown-none)",
        ebpf,
    ));

    let mut failed = Vec::new();
    for (label, mut c) in checks {
        banner(label);
        let (stderr_tail, status) = exec::live_status(&mut c)?;
        if !status.success() {
            eprintln!(
                "FAILED: {label} ({status}): `{}`\n{stderr_tail}",
                exec::describe(&c)
            );
            failed.push(label);
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join("; "));
    }
    println!("\nlint: ok");
    Ok(())
}

/// `cargo xtask demo`: setup, release build, then the demo binary with XLB_BIN set.
fn demo(args: &[String]) -> Result<()> {
    run_tool("demo", "xlb-demo", args)
}

/// `cargo xtask bench`: setup, release build, then the bench binary.
fn bench(quick: bool, args: &[String]) -> Result<()> {
    let mut all: Vec<String> = Vec::new();
    if quick {
        all.push("--quick".into());
    }
    all.extend(args.iter().cloned());
    run_tool("bench", "xlb-bench", &all)
}

/// Setup, release build of xlb, then `cargo run` of one xlb-tests binary with XLB_BIN set.
fn run_tool(label: &str, bin: &str, args: &[String]) -> Result<()> {
    banner("setup");
    setup::setup()?;
    let ws = workspace()?;
    let xlb = build_xlb(&ws)?;
    banner(label);
    let mut c = cargo(&["run", "--release", "-p", "xlb-tests", "--bin", bin, "--"]);
    c.args(args).env("XLB_BIN", &xlb);
    exec::live(&mut c)
}
