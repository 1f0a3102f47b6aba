//! The test run of `cargo xtask test`: every test binary of the workspace runs, also after
//! one fails (`--no-fail-fast`); each gets one line — passed, failed or not run — and the
//! last line counts every test that should have run. A test that never reported (its binary
//! crashed, or never started) counts as failed, so the total cannot look cleaner than the run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const TEST: &[&str] = &["test", "--workspace", "--all-targets", "--no-fail-fast"];

/// The Dockvpn data-path suites, run a second time with the data path on one thread: the
/// first pass runs them with the default (one thread per CPU the machine gives us).
const ONE_THREAD_SUITES: &[&str] = &[
    "openvpn",
    "openvpn_protocol",
    "openvpn_tcp",
    "openvpn_tls_crypt",
    "openvpn_under_load",
    "wireguard",
];
const ONE_THREAD: (&str, &str) = ("DOCKVPN_THREADS", "1");

/// One test binary cargo builds for `cargo test --workspace --all-targets`.
struct Suite {
    /// Its source file, relative to the workspace: `tests/tests/dhcp.rs`.
    source: String,
    /// The executable's file name, which cargo's "Running … (path)" line ends with.
    executable: String,
    /// How many tests the binary lists; None when it could not list them (the suite fails).
    expected: Option<u64>,
    started: bool,
    /// The binary's own "test result:" line was seen.
    finished: bool,
    passed: u64,
    failed: u64,
    ignored: u64,
}

enum Verdict {
    Passed,
    Failed,
    NotRun,
}

impl Suite {
    /// Tests that never reported a result.
    fn unreported(&self) -> u64 {
        self.expected
            .unwrap_or(0)
            .saturating_sub(self.passed + self.failed + self.ignored)
    }

    fn verdict(&self) -> Verdict {
        match (self.started, self.finished) {
            _ if self.expected.is_none() => Verdict::Failed,
            (false, _) => Verdict::NotRun,
            (true, true) if self.failed == 0 && self.unreported() == 0 => Verdict::Passed,
            _ => Verdict::Failed,
        }
    }

    fn line(&self) -> String {
        let (passed, failed) = (self.passed, self.failed);
        let Some(expected) = self.expected else {
            return format!("  FAILED   {} (its tests could not be listed)", self.source);
        };
        match self.verdict() {
            Verdict::Passed if expected == 0 => format!("  passed   {} (no tests)", self.source),
            Verdict::Passed => format!("  passed   {} ({passed} of {expected})", self.source),
            Verdict::Failed if !self.finished => format!(
                "  FAILED   {} (stopped without a result after {} of {expected} tests: crashed or killed)",
                self.source,
                passed + failed + self.ignored
            ),
            Verdict::Failed => format!(
                "  FAILED   {} ({failed} of {expected} failed)",
                self.source
            ),
            Verdict::NotRun => format!(
                "  NOT RUN  {} ({expected} tests never ran)",
                self.source
            ),
        }
    }
}

/// Builds and runs every test binary, echoing cargo's output, then prints the suite lines
/// and the count. Ok(false) when anything failed, did not run or did not build.
pub fn run() -> Result<bool, String> {
    let Some(mut suites) = build()? else {
        println!(
            "\nbuild: FAILED (cargo test --no-run did not compile the workspace); no test ran"
        );
        println!("tests: 0 passed, 0 failed");
        return Ok(false);
    };
    let mut succeeded = run_and_tally(&mut suites, TEST, None)?;
    let mut one_thread: Vec<Suite> = suites
        .iter()
        .filter(|s| {
            ONE_THREAD_SUITES
                .iter()
                .any(|name| s.source == format!("tests/tests/{name}.rs"))
        })
        .map(|s| Suite {
            source: format!("{} ({}={})", s.source, ONE_THREAD.0, ONE_THREAD.1),
            executable: s.executable.clone(),
            expected: s.expected,
            started: false,
            finished: false,
            passed: 0,
            failed: 0,
            ignored: 0,
        })
        .collect();
    if one_thread.len() != ONE_THREAD_SUITES.len() {
        return Err(format!(
            "the one-thread pass names {ONE_THREAD_SUITES:?} but cargo built {} of them",
            one_thread.len()
        ));
    }
    // `--workspace`, as the first pass: with `-p` cargo unifies other features, builds other
    // executables, and their "Running" lines would name no suite.
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    for name in ONE_THREAD_SUITES {
        args.extend(["--test", name]);
    }
    succeeded &= run_and_tally(&mut one_thread, &args, Some(ONE_THREAD))?;
    suites.append(&mut one_thread);

    println!("\nsuites (cargo {}):", TEST.join(" "));
    for suite in &suites {
        println!("{}", suite.line());
    }
    let passed: u64 = suites.iter().map(|s| s.passed).sum();
    let failed: u64 = suites.iter().map(|s| s.failed).sum();
    let unreported: u64 = suites.iter().map(Suite::unreported).sum();
    let clean = suites
        .iter()
        .all(|s| matches!(s.verdict(), Verdict::Passed));
    if unreported > 0 {
        println!("{unreported} tests never reported a result; they count as failed");
    }
    if clean && !succeeded {
        println!("cargo test failed although every suite passed; see its output above");
    }
    println!("tests: {passed} passed, {} failed", failed + unreported);
    Ok(clean && succeeded)
}

/// `cargo test --no-run`: the test binaries that must run, each with the number of tests it
/// lists. None when the build fails (cargo has printed why).
fn build() -> Result<Option<Vec<Suite>>, String> {
    let mut command = Command::new(crate::cargo_program());
    command
        .args(TEST)
        .args(["--no-run", "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped())
        // Compiler errors, rendered as text by cargo, go straight to the terminal.
        .stderr(Stdio::inherit());
    eprintln!("+ {command:?}");
    let output = command
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if !output.status.success() {
        return Ok(None);
    }
    let root = crate::images::workspace();
    let mut suites = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(executable), Some(source), Some(true)) = (
            message["executable"].as_str(),
            message["target"]["src_path"].as_str(),
            message["profile"]["test"].as_bool(),
        ) else {
            continue;
        };
        let executable = PathBuf::from(executable);
        suites.push(Suite {
            source: Path::new(source)
                .strip_prefix(&root)
                .unwrap_or(Path::new(source))
                .display()
                .to_string(),
            expected: listed_tests(&executable)
                .inspect_err(|error| eprintln!("xtask: {error}"))
                .ok(),
            executable: file_name(&executable),
            started: false,
            finished: false,
            passed: 0,
            failed: 0,
            ignored: 0,
        });
    }
    suites.sort_by(|a, b| a.source.cmp(&b.source));
    if suites.is_empty() {
        return Err(format!(
            "{command:?} named no test binary; cannot tell which suites must run"
        ));
    }
    Ok(Some(suites))
}

/// Runs `cargo ARGS` (with `env` set), echoing every line and tallying them per suite.
/// Whether cargo succeeded.
fn run_and_tally(
    suites: &mut [Suite],
    args: &[&str],
    env: Option<(&str, &str)>,
) -> Result<bool, String> {
    // One stream for cargo's "Running" lines (stderr) and the tests' output (stdout), so
    // each result line follows the suite it belongs to.
    let mut command = Command::new("sh");
    command
        .args(["-c", "exec \"$0\" \"$@\" 2>&1"])
        .arg(crate::cargo_program())
        .args(args)
        .envs(env)
        .stdout(Stdio::piped());
    let prefix = env.map_or(String::new(), |(name, value)| format!("{name}={value} "));
    eprintln!("+ {prefix}cargo {}", args.join(" "));
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    let mut current: Option<usize> = None;
    if let Some(output) = child.stdout.take() {
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(executable) = running_executable(&line) {
                current = suites.iter().position(|s| s.executable == executable);
                if let Some(index) = current {
                    suites[index].started = true;
                }
            } else if let Some(suite) = current.map(|index| &mut suites[index]) {
                tally(suite, &line);
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    Ok(status.success())
}

/// Counts one output line of a running test binary.
fn tally(suite: &mut Suite, line: &str) {
    if let Some(result) = line.strip_prefix("test result: ") {
        // The binary's own count replaces the per-test one.
        suite.passed = count_before(result, "passed");
        suite.failed = count_before(result, "failed");
        suite.ignored = count_before(result, "ignored");
        suite.finished = true;
    } else if line.starts_with("test ") && !suite.finished {
        if line.ends_with(" ... ok") {
            suite.passed += 1;
        } else if line.ends_with(" ... FAILED") {
            suite.failed += 1;
        } else if line.contains(" ... ignored") {
            suite.ignored += 1;
        }
    }
}

/// The executable's file name in cargo's `     Running tests/dhcp.rs (target/debug/deps/dhcp-…)`.
fn running_executable(line: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix("Running ")?;
    let path = rest.rsplit_once('(')?.1.strip_suffix(')')?;
    Some(file_name(Path::new(path)))
}

/// The number just before `label` in a libtest "test result:" line.
fn count_before(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| {
            let part = part.trim();
            let part = part.rsplit_once(". ").map_or(part, |(_, count)| count);
            part.strip_suffix(label)?.trim().parse().ok()
        })
        .unwrap_or(0)
}

/// The number of tests a test binary lists (`--list --format terse`: `name: test` lines).
fn listed_tests(executable: &Path) -> Result<u64, String> {
    let output = Command::new(executable)
        .args(["--list", "--format", "terse"])
        .output()
        .map_err(|e| format!("cannot list the tests of {}: {e}", executable.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} --list failed: {}",
            executable.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count() as u64)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suite(expected: u64) -> Suite {
        Suite {
            source: "tests/tests/dhcp.rs".into(),
            executable: "dhcp-0123".into(),
            expected: Some(expected),
            started: false,
            finished: false,
            passed: 0,
            failed: 0,
            ignored: 0,
        }
    }

    #[test]
    fn reads_the_counts_of_a_result_line() {
        let line =
            "ok. 7 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 3.2s";
        assert_eq!(count_before(line, "passed"), 7);
        assert_eq!(count_before(line, "failed"), 2);
        assert_eq!(count_before(line, "ignored"), 1);
        assert_eq!(count_before("FAILED. 3 passed; 4 failed;", "passed"), 3);
    }

    #[test]
    fn finds_the_executable_of_a_running_line() {
        assert_eq!(
            running_executable("     Running tests/dhcp.rs (target/debug/deps/dhcp-0123)"),
            Some("dhcp-0123".into())
        );
        assert_eq!(
            running_executable(
                "     Running unittests src/lib.rs (target/debug/deps/vnf_core-4567)"
            ),
            Some("vnf_core-4567".into())
        );
        assert_eq!(running_executable("test running ... ok"), None);
    }

    #[test]
    fn a_suite_is_passed_failed_or_not_run() {
        let mut never = suite(3);
        assert!(matches!(never.verdict(), Verdict::NotRun));
        assert_eq!(never.unreported(), 3);
        never.started = true;
        tally(&mut never, "test a ... ok");
        assert!(
            matches!(never.verdict(), Verdict::Failed),
            "a binary that stops without its result line failed"
        );
        assert_eq!(never.unreported(), 2);

        let mut clean = suite(2);
        clean.started = true;
        tally(&mut clean, "test a ... ok");
        tally(&mut clean, "test b ... ok");
        tally(&mut clean, "test result: ok. 2 passed; 0 failed; 0 ignored");
        assert!(matches!(clean.verdict(), Verdict::Passed));

        let mut failing = suite(2);
        failing.started = true;
        tally(&mut failing, "test a ... FAILED");
        tally(
            &mut failing,
            "test result: FAILED. 1 passed; 1 failed; 0 ignored",
        );
        assert!(matches!(failing.verdict(), Verdict::Failed));
        assert_eq!((failing.passed, failing.failed), (1, 1));
    }
}
