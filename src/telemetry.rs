//! Logging setup for the long-running controller: JSON lines (default) or human text, filtered
//! by `RUST_LOG` or the `--log-level` flag. Spans are flattened into each line, so every line of
//! a reconcile carries the object it is about.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

/// The filter: `RUST_LOG` when set and not empty, else `level`.
fn filter(level: &str, rust_log: Option<&str>) -> Result<EnvFilter, String> {
    match rust_log.map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => EnvFilter::try_new(v).map_err(|e| {
            format!("RUST_LOG={v:?} is not a valid filter ({e}); use e.g. info or sombrero=debug,kube=warn")
        }),
        None => EnvFilter::try_new(level).map_err(|e| {
            format!("--log-level {level:?} is not a valid filter ({e}); use e.g. info or sombrero=debug,kube=warn")
        }),
    }
}

/// Installs the global subscriber. `level` is an `EnvFilter` directive (`info`,
/// `sombrero=debug,kube=info`); `RUST_LOG` wins when set. Calling it twice is harmless (the
/// second call keeps the first subscriber), which tests that start the controller rely on.
pub fn init(level: &str, format: LogFormat) -> Result<(), String> {
    let filter = filter(level, std::env::var("RUST_LOG").ok().as_deref())?;
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_target(true),
            )
            .try_init(),
        LogFormat::Text => registry.with(fmt::layer().with_target(false)).try_init(),
    };
    // Already initialised (a test started a second controller): keep the first subscriber.
    let _ = result;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_filter_is_refused_with_the_fix() {
        let err = filter("sombrero=[", None).unwrap_err();
        assert!(err.contains("--log-level"), "{err}");
        let err = filter("info", Some("x=[")).unwrap_err();
        assert!(err.contains("RUST_LOG"), "{err}");
        assert!(filter("info", Some("  ")).is_ok());
        assert!(filter("sombrero=debug,kube=warn", None).is_ok());
    }
}
