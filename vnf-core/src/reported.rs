//! Conditions a loop re-checks every few seconds are logged once, and again only when they
//! change: a warning repeated every 5 s buries the log it is meant to stand out in.

/// The last reported state of one condition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reported<T>(Option<T>);

impl<T: PartialEq> Reported<T> {
    /// Records `now`; true when it differs from what was reported last (or nothing was).
    pub fn changed(&mut self, now: T) -> bool {
        if self.0.as_ref() == Some(&now) {
            return false;
        }
        self.0 = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_is_reported_once_and_again_when_it_changes() {
        let mut reported = Reported::default();
        assert!(reported.changed(0));
        assert!(!reported.changed(0));
        assert!(!reported.changed(0));
        assert!(reported.changed(1));
        assert!(reported.changed(0));
        assert!(!reported.changed(0));
    }
}
