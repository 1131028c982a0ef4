//! Printing an error with its causes.
//!
//! An error's `Display` says what failed and leaves out its cause when the cause is reachable
//! through [`std::error::Error::source`] (so that printing the chain names each cause once).
//! [`Chain`] prints the whole chain, `what: cause: cause`, for logs and messages that are
//! written from a single `Display`.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its sources, separated by `": "`.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[test]
    fn each_cause_is_named_once() {
        let error =
            crate::gcks::EngineError::Io(std::io::Error::from(std::io::ErrorKind::AddrInUse));
        let text = Chain(&error).to_string();
        assert_eq!(text.matches("in use").count(), 1, "{text}");
        assert!(text.starts_with("event loop: "), "{text}");
    }
}
