//! The `relay` command: parses arguments, loads the config, and calls into
//! the library. Exit codes: 0 success, 1 failure at run time, 2 bad usage,
//! 78 (EX_CONFIG) a config relay cannot use, so systemd can stop restarting.
//!
//! The clap definitions here are the one source of `--help`, the shell
//! completions (`relay completions SHELL`) and the man pages (`relay man`,
//! hidden: the package build runs it), so none of them can drift.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use relay::GIT_COMMIT;
use relay::cli::encode;
use relay::config::Config;
use relay::daemon::Control;
use relay::server::{Inherited, Listeners};
use tracing::{error, info};

mod remote;

use remote::{EventsAction, JobsAction, admin_command, catch_up, events, jobs, shadow};

// glibc's malloc showed up as an eighth of relay's CPU under load (arena
// locking, consolidation); mimalloc's thread-local pages cost a fraction.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EX_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(
    name = "relay",
    about = "Receive Git webhooks, route them, trigger CI pipelines durably"
)]
struct Cli {
    /// Log format: human-readable text, JSON lines, or text on a terminal and JSON otherwise.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        #[arg(short, long, default_value = "relay.toml", env = "RELAY_CONFIG")]
        config: PathBuf,
    },
    /// Validate the config and list its sources, routes and targets.
    Check {
        #[arg(short, long, default_value = "relay.toml", env = "RELAY_CONFIG")]
        config: PathBuf,
    },
    /// Show which routes a payload matches and the exact requests (secrets redacted):
    /// `-s SOURCE -e EVENT FILE`, or `--event ID` for a stored delivery (via the admin API).
    Explain {
        #[arg(short, long, default_value = "relay.toml", env = "RELAY_CONFIG")]
        config: PathBuf,
        /// The source's name, as in [sources.NAME] (with FILE).
        #[arg(short, long, requires = "file")]
        source: Option<String>,
        /// The sender's event name (push, Push Hook, repo:push, …) with FILE;
        /// without FILE, the id of a delivery relay stored.
        #[arg(short, long)]
        event: String,
        /// A file holding the JSON payload.
        #[arg(requires = "source")]
        file: Option<PathBuf>,
        /// The admin API's base URL, for a stored delivery; default: http://{admin.listen}.
        #[arg(long)]
        admin: Option<String>,
    },
    /// See and retry jobs through a running relay's admin API.
    Jobs {
        #[arg(short, long, default_value = "relay.toml", env = "RELAY_CONFIG")]
        config: PathBuf,
        /// The admin API's base URL; default: http://{admin.listen}.
        #[arg(long)]
        admin: Option<String>,
        /// Print the API's JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: JobsAction,
    },
    /// Ask GitHub, through a running relay, to redeliver each failed delivery
    /// of a source's hook that relay never received; print what was asked.
    #[command(name = "catch-up")]
    CatchUp {
        #[arg(short, long, default_value = "relay.toml", env = "RELAY_CONFIG")]
        config: PathBuf,
        /// The admin API's base URL; default: http://{admin.listen}.
        #[arg(long)]
        admin: Option<String>,
        /// The GitHub source, as in [sources.NAME], with catch_up set.
        #[arg(short, long)]
        source: String,
        /// Deliveries since this time (RFC 3339) or this long ago (2h); default: the 3 days GitHub keeps.
        #[arg(long)]
        since: Option<String>,
        /// Print the API's JSON instead of a list.
        #[arg(long)]
        json: bool,
    },
    /// Shadow runs through a running relay's admin API: per route, how many
    /// agreed, and the latest disagreements with both pipelines' pages.
    Shadow {
        #[arg(short, long, default_value = "relay.toml", env = "RELAY_CONFIG")]
        config: PathBuf,
        /// The admin API's base URL; default: http://{admin.listen}.
        #[arg(long)]
        admin: Option<String>,
        /// Only this route's runs.
        #[arg(long)]
        route: Option<String>,
        /// Runs since this time (RFC 3339) or this long ago (24h, 7d).
        #[arg(long, default_value = "7d")]
        since: String,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// See, explain and replay stored deliveries through a running relay's admin API.
    Events {
        #[arg(short, long, default_value = "relay.toml", env = "RELAY_CONFIG")]
        config: PathBuf,
        /// The admin API's base URL; default: http://{admin.listen}.
        #[arg(long)]
        admin: Option<String>,
        /// Print the API's JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: EventsAction,
    },
    /// Sign a payload with the source's secret and post it to relay (test-fire).
    Send {
        #[arg(short, long, default_value = "relay.toml", env = "RELAY_CONFIG")]
        config: PathBuf,
        #[arg(short, long)]
        source: String,
        #[arg(short, long)]
        event: String,
        file: PathBuf,
        /// Where to post; default: the first server.listen address and the source's path.
        #[arg(long)]
        url: Option<String>,
    },
    /// Print the shell completion script (bash: `source <(relay completions bash)`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the relay(1) man page as roff, or write every page into a directory.
    #[command(hide = true)]
    Man {
        /// Write relay.1 and a relay-COMMAND.1 page per subcommand here.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// The command line as clap sees it, with the version lines: `-V` prints
/// the version and commit, `--version` adds the store schema versions this
/// build migrates to.
fn command() -> clap::Command {
    let version = env!("CARGO_PKG_VERSION");
    Cli::command()
        .version(format!("{version} ({GIT_COMMIT})"))
        .long_version(format!(
            "{version}\ncommit: {GIT_COMMIT}\nstore schema: sqlite {}, postgres {}",
            relay::store::SQLITE_SCHEMA_VERSION,
            relay::store::POSTGRES_SCHEMA_VERSION,
        ))
}

fn main() -> ExitCode {
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.format(&mut command()).exit(),
    };
    // These only print what the clap definitions say; no logging, no runtime.
    match &cli.command {
        Command::Completions { shell } => return completions(*shell),
        Command::Man { dir } => return man(dir.as_deref()),
        _ => {}
    }
    // Sockets systemd passed in must be taken before any other thread runs
    // (the log writer's included).
    let inherited = match &cli.command {
        Command::Serve { .. } => match relay::server::Inherited::take() {
            Ok(inherited) => inherited,
            Err(e) => {
                eprintln!("relay: cannot use the sockets systemd passed in: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    // Declared before the runtime, so dropped after it: what its tasks log
    // on the way out is written too.
    let _log_writer = init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command, inherited))
}

fn completions(shell: clap_complete::Shell) -> ExitCode {
    // Into memory first: clap_complete panics when its writer fails (a
    // closed pipe); writing to stdout here reports the error instead.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command(), "relay", &mut script);
    print_bytes(&script, "the completions")
}

fn print_bytes(bytes: &[u8], what: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: cannot write {what}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// relay(1) on stdout, or with `dir` that page and one per subcommand
/// (`relay-serve.1`, `relay-jobs-list.1`, …), the way git ships its pages.
fn man(dir: Option<&std::path::Path>) -> ExitCode {
    let mut cmd = command().disable_help_subcommand(true);
    cmd.build();
    let mut roff = Vec::new();
    let result = match dir {
        None => page(cmd).render(&mut roff),
        Some(dir) => write_pages(cmd, dir),
    };
    match result {
        Ok(()) => print_bytes(&roff, "the man page"),
        Err(e) => {
            eprintln!("relay: cannot write the man pages: {e}");
            ExitCode::FAILURE
        }
    }
}

fn page(cmd: clap::Command) -> clap_mangen::Man {
    let title = cmd.get_display_name().unwrap_or(cmd.get_name()).to_uppercase();
    clap_mangen::Man::new(cmd).title(title)
}

fn write_pages(cmd: clap::Command, dir: &std::path::Path) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir)?;
    }
    page(cmd).generate_to(dir).map(drop)
}

/// The log lines that may wait for the log's thread. Its queue is allocated
/// whole (32 bytes a line): the default, 128,000, cost 3 MiB of RSS; this
/// many are a second of the heaviest load's lines.
const LOG_LINES_QUEUED: usize = 16_384;

/// Logs to stderr through a writer thread of their own, which writes the
/// lines queued while it wrote the last batch in one `write(2)`: one a line
/// cost 4.6% of relay's CPU at 32 connections (two lines a webhook). No line
/// is dropped: when [`LOG_LINES_QUEUED`] wait, logging blocks, as a full
/// pipe did.
/// The guard writes what is queued when `main` returns; a SIGKILL loses what
/// was queued and not yet written, the last moment's lines.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RELAY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_LINES_QUEUED)
        .thread_name("relay-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if json {
        builder
            .fmt_fields(relay::log_lines::JsonMembers)
            .event_format(relay::log_lines::JsonLine)
            .init();
    } else {
        builder.init();
    }
    guard
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("relay: {e}");
        ExitCode::from(EX_CONFIG)
    })
}

fn read_payload(path: &std::path::Path) -> Result<Bytes, ExitCode> {
    std::fs::read(path).map(Bytes::from).map_err(|e| {
        eprintln!("relay: cannot read {}: {e}", path.display());
        ExitCode::FAILURE
    })
}

async fn run(command: Command, inherited: Option<Inherited>) -> ExitCode {
    match command {
        Command::Serve { config } => serve(config, inherited).await,
        Command::Check { config } => match load(&config) {
            Ok(config) => {
                let schema = relay::store::schema_status(&config.store).await;
                print!("{}", relay::cli::check_report(&config, &schema));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Explain {
            config,
            event,
            admin,
            source: None,
            ..
        } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let path = format!("/api/events/{}/explain", encode(&event));
            admin_command(&config, admin, false, reqwest::Method::GET, &path, |body| {
                body["text"].as_str().unwrap_or_default().to_owned()
            })
            .await
        }
        Command::Explain {
            config,
            source: Some(source),
            event,
            file,
            ..
        } => {
            let file = file.unwrap_or_default();
            let (config, payload) = match (load(&config), read_payload(&file)) {
                (Ok(c), Ok(p)) => (c, p),
                (Err(code), _) | (_, Err(code)) => return code,
            };
            match relay::cli::explain(&config, &source, &event, payload) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("relay: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Jobs {
            config,
            admin,
            json,
            action,
        } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            jobs(&config, admin, json, action).await
        }
        Command::CatchUp {
            config,
            admin,
            source,
            since,
            json,
        } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            catch_up(&config, admin, &source, since.as_deref(), json).await
        }
        Command::Shadow {
            config,
            admin,
            route,
            since,
            json,
        } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            shadow(&config, admin, route, &since, json).await
        }
        Command::Events {
            config,
            admin,
            json,
            action,
        } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            events(&config, admin, json, action).await
        }
        Command::Send {
            config,
            source,
            event,
            file,
            url,
        } => {
            let (config, payload) = match (load(&config), read_payload(&file)) {
                (Ok(c), Ok(p)) => (c, p),
                (Err(code), _) | (_, Err(code)) => return code,
            };
            match relay::cli::send(&config, &source, &event, payload, url).await {
                Ok((status, body)) => {
                    println!("{status} {body}");
                    if (200..300).contains(&status) {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("relay: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        // Answered in `main`, before the runtime starts.
        Command::Completions { .. } | Command::Man { .. } => ExitCode::SUCCESS,
    }
}

async fn serve(path: PathBuf, inherited: Option<Inherited>) -> ExitCode {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let listeners = match Listeners::bind_with(&config, inherited).await {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let control = Control::default();
    let signals = match handle_signals(control.clone()) {
        Ok(task) => task,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let result = relay::daemon::run(config, listeners, control).await;
    signals.abort();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "relay failed");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM and SIGINT start the one shutdown path; SIGHUP asks for a reload.
fn handle_signals(control: Control) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => {
                    info!(signal = "SIGHUP", "reloading the config");
                    control.reload.notify_one();
                    continue;
                }
            };
            info!(
                signal = name,
                "shutting down: no new connections; finishing open requests and sends"
            );
            control.shutdown.cancel();
            return;
        }
    }))
}
