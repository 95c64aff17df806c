//! Log output: a filter from `WATERSHED_LOG`, text or JSON lines from
//! `WATERSHED_LOG_FORMAT`, colour only on a terminal.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (timestamp, level, target, fields), for
    /// log shippers.
    Json,
}

/// The logging settings taken from the environment.
#[derive(Debug)]
pub(crate) struct Logging {
    filter: EnvFilter,
    format: Format,
    ansi: bool,
}

impl Logging {
    /// Reads `WATERSHED_LOG` (a filter such as `info` or
    /// `watershed_lake=debug`; `default_level` when unset),
    /// `WATERSHED_LOG_FORMAT` (`text` or `json`) and `NO_COLOR`. A value
    /// that cannot be used is an error naming the variable, not a silent
    /// fallback.
    pub(crate) fn from_env(default_level: &str) -> Result<Self, String> {
        Self::from_vars(default_level, |k| std::env::var(k).ok(), std::io::stderr().is_terminal())
    }

    fn from_vars(
        default_level: &str,
        var: impl Fn(&str) -> Option<String>,
        terminal: bool,
    ) -> Result<Self, String> {
        let filter = match var("WATERSHED_LOG") {
            None => EnvFilter::new(default_level),
            Some(v) => EnvFilter::try_new(&v).map_err(|e| format!("WATERSHED_LOG={v:?}: {e}"))?,
        };
        let format = match var("WATERSHED_LOG_FORMAT").as_deref().map(str::trim) {
            None | Some("") => Format::Text,
            Some(f) if f.eq_ignore_ascii_case("text") => Format::Text,
            Some(f) if f.eq_ignore_ascii_case("json") => Format::Json,
            Some(f) => return Err(format!("WATERSHED_LOG_FORMAT={f:?}: expected `text` or `json`")),
        };
        // https://no-color.org: any non-empty value turns colour off.
        let no_color = var("NO_COLOR").is_some_and(|v| !v.is_empty());
        Ok(Self { filter, format, ansi: terminal && !no_color && format == Format::Text })
    }

    /// Installs the subscriber, writing to stderr.
    pub(crate) fn init(self) {
        let builder = tracing_subscriber::fmt().with_env_filter(self.filter).with_writer(std::io::stderr);
        match self.format {
            Format::Text => builder.with_ansi(self.ansi).init(),
            Format::Json => builder.json().with_ansi(false).init(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Format, Logging};

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(Logging::from_vars("info", vars(&[]), true).unwrap().ansi);
        assert!(
            !Logging::from_vars("info", vars(&[]), false).unwrap().ansi,
            "a file or pipe gets no escapes"
        );
        assert!(!Logging::from_vars("info", vars(&[("NO_COLOR", "1")]), true).unwrap().ansi);
        assert!(Logging::from_vars("info", vars(&[("NO_COLOR", "")]), true).unwrap().ansi);
        let json = Logging::from_vars("info", vars(&[("WATERSHED_LOG_FORMAT", "json")]), true).unwrap();
        assert_eq!(json.format, Format::Json);
        assert!(!json.ansi);
    }

    #[test]
    fn formats_and_filters_are_checked() {
        let text = Logging::from_vars("warn", vars(&[("WATERSHED_LOG_FORMAT", " Text ")]), false).unwrap();
        assert_eq!(text.format, Format::Text);
        assert_eq!(text.filter.to_string(), "warn");
        let e = Logging::from_vars("info", vars(&[("WATERSHED_LOG_FORMAT", "yaml")]), false).unwrap_err();
        assert_eq!(e, "WATERSHED_LOG_FORMAT=\"yaml\": expected `text` or `json`");
        let e =
            Logging::from_vars("info", vars(&[("WATERSHED_LOG", "watershed_lake=loud")]), false).unwrap_err();
        assert!(e.starts_with("WATERSHED_LOG=\"watershed_lake=loud\": "), "{e}");
        let custom =
            Logging::from_vars("info", vars(&[("WATERSHED_LOG", "watershed_lake=debug")]), false).unwrap();
        assert_eq!(custom.filter.to_string(), "watershed_lake=debug");
    }
}
