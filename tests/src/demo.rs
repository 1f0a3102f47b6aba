//! What the demos print: a step heading and an outcome word.

pub fn step(text: &str) {
    println!("\n==> {text}");
}

pub fn outcome(ok: bool) -> &'static str {
    if ok {
        "passes"
    } else {
        "BLOCKED"
    }
}
