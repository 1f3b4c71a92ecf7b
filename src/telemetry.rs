//! Logging setup. The long-running controller ([`init`]): JSON lines (default) or human text,
//! filtered by `RUST_LOG` or the `--log-level` flag; spans are flattened into each line, so every
//! line of a reconcile carries the object it is about. The one-shot commands ([`init_cli`]):
//! warnings and errors as text on stderr.

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
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
/// Text lines carry colour codes only when stdout is a terminal: in a pod they would end up
/// as `\x1b[32m` in the log collector.
pub fn init(level: &str, format: LogFormat) -> Result<(), String> {
    let filter = filter(level, std::env::var("RUST_LOG").ok().as_deref())?;
    let ansi = std::io::stdout().is_terminal();
    // Already initialised (a test started a second controller): keep the first subscriber.
    let _ = controller_subscriber(filter, format, std::io::stdout, ansi).try_init();
    Ok(())
}

fn controller_subscriber<W>(
    filter: EnvFilter,
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => Box::new(
            registry.with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_target(true)
                    .with_writer(writer),
            ),
        ),
        LogFormat::Text => Box::new(
            registry.with(
                fmt::layer()
                    .with_writer(writer)
                    .with_ansi(ansi)
                    .with_target(false),
            ),
        ),
    }
}

/// Logging for `sombrero build` and `sombrero prune`: text on stderr (stdout carries their
/// results), warnings and errors only unless `RUST_LOG` says otherwise. Without a subscriber the
/// Proxmox client's warnings (TLS verification disabled, a call retried) would go nowhere.
pub fn init_cli() -> Result<(), String> {
    let filter = filter("warn", std::env::var("RUST_LOG").ok().as_deref())?;
    let stderr_is_tty = std::io::stderr().is_terminal();
    // Already initialised: keep the first subscriber, as `init` does.
    let _ = cli_subscriber(filter, std::io::stderr, stderr_is_tty).try_init();
    Ok(())
}

fn cli_subscriber<W>(filter: EnvFilter, writer: W, ansi: bool) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::registry().with(filter).with(
        fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .with_target(false),
    )
}

/// For a test that captures logs with a thread-local subscriber: held while it runs. tracing
/// caches each callsite's interest process-wide, and while at most one dispatcher exists it asks
/// the registering thread's, so another test's thread (no subscriber) reaching a callsite first
/// would pin it to "never" and the capture would miss it. With this second dispatcher alive,
/// every registration asks all of them.
#[cfg(test)]
pub(crate) fn interest_anchor() -> tracing::Dispatch {
    tracing::Dispatch::new(tracing_subscriber::registry())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captures what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut out) = self.0.lock() {
                out.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn cli_logging_shows_the_insecure_tls_warning_and_hides_info() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber =
            cli_subscriber(filter("warn", None).unwrap(), move || writer.clone(), false);
        let _anchor = interest_anchor();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("routine progress");
            crate::proxmox::tls::client_config(&crate::proxmox::TlsMode::Insecure).unwrap();
        });
        let text = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
        assert!(text.contains("WARN") && text.contains("DISABLED"), "{text}");
        assert!(!text.contains("routine progress"), "{text}");
    }

    #[test]
    fn text_logs_have_colour_codes_only_on_a_terminal() {
        for ansi in [false, true] {
            let out = Captured::default();
            let writer = out.clone();
            let subscriber = controller_subscriber(
                filter("info", None).unwrap(),
                LogFormat::Text,
                move || writer.clone(),
                ansi,
            );
            let _anchor = interest_anchor();
            tracing::subscriber::with_default(subscriber, || {
                tracing::warn!(object = "ns/img", "reconcile failed");
            });
            let text = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
            assert!(text.contains("reconcile failed"), "{text}");
            assert_eq!(text.contains('\x1b'), ansi, "ansi {ansi}: {text:?}");
        }
    }

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
