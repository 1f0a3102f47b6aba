//! `cargo xtask graph [--out DIR] [--project NAME] [--json]`: the running chain as Graphviz
//! DOT, SVG and PNG. The work is the harness binary `chain-graph` (docknfv-tests), which
//! reads Docker through the same bollard client as the Docker suites.

/// Runs `chain-graph` with the arguments after `graph`.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut cargo_args = vec![
        "run",
        "--quiet",
        "--package",
        "docknfv-tests",
        "--bin",
        "chain-graph",
        "--",
    ];
    cargo_args.extend(args.iter().map(String::as_str));
    crate::cargo(&cargo_args)
}
