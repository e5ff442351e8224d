//! The end-to-end suite (`tests/e2e`, pytest) against the `tga-serve` binary that cargo built for
//! this test run, so that `cargo test --workspace` runs everything.
//!
//! The Python clients (`tests/e2e/requirements.txt`: the official `openai` client, pytest,
//! requests) live in a venv at `<target>/e2e-venv`, created on the first run and reinstalled
//! whenever the requirements or the Python version change. The Prometheus test needs Debian's
//! `prometheus` on PATH (`.ci/run` installs it).
//!
//! `TGA_E2E_PYTEST_ARGS` passes extra arguments to pytest (e.g. `-k errors -x`);
//! `TGA_E2E_PYTHON` names the interpreter that creates the venv (default `python3`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

const BINARY: &str = env!("CARGO_BIN_EXE_tga-serve");
const STAMP: &str = "requirements.stamp";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the server crate sits in the workspace")
        .to_path_buf()
}

/// `<target>/debug/tga-serve` → `<target>`, wherever `CARGO_TARGET_DIR` put it.
fn target_dir() -> PathBuf {
    Path::new(BINARY)
        .parent()
        .and_then(Path::parent)
        .expect("the binary lives in <target>/<profile>/")
        .to_path_buf()
}

fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `command` to completion, panicking with its output if it fails.
fn run(command: &mut Command, what: &str) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("{what}: cannot run {command:?}: {err}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}",
        output.status,
        output_text(&output)
    );
    output
}

/// The venv's interpreter, with the pinned requirements installed.
fn venv_python(requirements: &Path) -> PathBuf {
    let base = std::env::var("TGA_E2E_PYTHON").unwrap_or_else(|_| "python3".into());
    let version = run(
        Command::new(&base).arg("--version"),
        "python3 (needed for the end-to-end tests)",
    );
    // The stamp says what the venv was made from; any difference means a fresh venv.
    let wanted = format!(
        "{}\n{}",
        output_text(&version).trim(),
        std::fs::read_to_string(requirements)
            .unwrap_or_else(|err| panic!("{}: {err}", requirements.display()))
    );
    let venv = target_dir().join("e2e-venv");
    let python = |dir: &Path| dir.join("bin").join("python");
    let current = |dir: &Path| {
        python(dir).exists()
            && std::fs::read_to_string(dir.join(STAMP)).ok() == Some(wanted.clone())
    };
    if current(&venv) {
        return python(&venv);
    }

    // Built beside the final place and moved in at the end, so an interrupted install or a second
    // test process never sees a half-made venv.
    let started = Instant::now();
    let staging = target_dir().join(format!("e2e-venv.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    run(
        Command::new(&base).args(["-m", "venv"]).arg(&staging),
        "creating the e2e venv (Debian: apt-get install python3-venv)",
    );
    run(
        Command::new(python(&staging))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(requirements),
        "installing tests/e2e/requirements.txt",
    );
    std::fs::write(staging.join(STAMP), &wanted).expect("write the venv stamp");
    let _ = std::fs::remove_dir_all(&venv);
    if let Err(err) = std::fs::rename(&staging, &venv) {
        // Another test process moved its own (identical) venv in first.
        let _ = std::fs::remove_dir_all(&staging);
        assert!(
            current(&venv),
            "cannot move the e2e venv into {}: {err}",
            venv.display()
        );
    }
    eprintln!(
        "e2e: created {} in {:.1} s",
        venv.display(),
        started.elapsed().as_secs_f64()
    );
    python(&venv)
}

#[test]
fn end_to_end_suite_against_the_real_binary() {
    let root = repo_root();
    let suite = root.join("tests").join("e2e");
    let python = venv_python(&suite.join("requirements.txt"));
    let extra = std::env::var("TGA_E2E_PYTEST_ARGS").unwrap_or_default();
    let started = Instant::now();
    let output = Command::new(&python)
        .args(["-m", "pytest", "-q"])
        .arg(&suite)
        .args(extra.split_whitespace())
        .current_dir(&root)
        .env("TGA_SERVE_BIN", BINARY)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|err| panic!("cannot run pytest with {}: {err}", python.display()));
    let text = output_text(&output);
    assert!(
        output.status.success(),
        "the end-to-end suite failed ({}):\n{text}",
        output.status
    );
    println!(
        "{text}\ne2e: pytest took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
