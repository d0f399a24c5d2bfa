//! The `reliable-mq` command line: argument parsing and output around [`crate::dlq`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use super::{Filter, ReplayOptions, ReplaySummary};
use crate::{Config, Error};

/// Operate a reliable-mq deployment. Connects to `AMQP_URL`
/// (default amqp://guest:guest@127.0.0.1:5672/%2f; amqps:// works too).
#[derive(Debug, Parser)]
#[command(name = "reliable-mq", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect, replay and purge dead-letter queues.
    #[command(subcommand)]
    Dlq(Dlq),
}

#[derive(Debug, Subcommand)]
enum Dlq {
    /// One row per dead letter: id, kind, error, attempts, failures, age. The queue is
    /// left as it was.
    List {
        /// The dead-letter queue (e.g. `orders.dlq`).
        dlq: String,
        /// Only this `x-error-kind` (repeatable): decode, rejected, retries-exhausted, ...
        #[arg(long)]
        kind: Vec<String>,
        /// Only dead letters that last failed since: 30m, 2h, 7d, 2026-11-30T04:00:00Z.
        #[arg(long)]
        since: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Headers and body of one dead letter (the body pretty-printed when it is JSON).
    Show {
        /// The dead-letter queue.
        dlq: String,
        /// Its `message_id`.
        message_id: String,
    },
    /// Republish dead letters to where they were first published (`x-original-exchange`,
    /// `x-original-routing-key`) with a fresh retry ladder, acking each only after the
    /// broker confirmed its copy.
    Replay {
        /// The dead-letter queue.
        dlq: String,
        /// Only this `message_id` (repeatable).
        #[arg(long)]
        id: Vec<String>,
        /// Only this `x-error-kind` (repeatable).
        #[arg(long)]
        kind: Vec<String>,
        /// Only dead letters that last failed since: 30m, 2h, 7d, 2026-11-30T04:00:00Z.
        #[arg(long)]
        since: Option<String>,
        /// Replay at most N.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Publish to EXCHANGE:ROUTING_KEY instead (`:queue` for the default exchange).
        #[arg(long, value_name = "EXCHANGE:ROUTING_KEY")]
        to: Option<String>,
        /// Count what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Refuse dead letters already replayed this many times (`x-replays`).
        #[arg(long, default_value_t = super::DEFAULT_MAX_REPLAYS)]
        max_replays: i64,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters.
    Purge {
        /// The dead-letter queue.
        dlq: String,
        /// Only this `x-error-kind` (repeatable).
        #[arg(long)]
        kind: Vec<String>,
        /// Only this `message_id` (repeatable).
        #[arg(long)]
        id: Vec<String>,
        /// Only dead letters that last failed before: 7d (ago), 2026-11-01, Unix ms.
        #[arg(long)]
        before: Option<String>,
        /// Really delete (required).
        #[arg(long)]
        yes: bool,
    },
}

/// Parse the arguments, run, print; exit 0 on success, 1 on failure (2 for bad usage).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn time_arg(name: &str, text: Option<&String>, now: i64) -> Result<Option<i64>, Error> {
    text.map(|t| super::parse_time(t, now).map_err(|e| Error::Config(format!("--{name}: {e}"))))
        .transpose()
}

async fn run(cli: Cli) -> Result<ExitCode, Error> {
    let config = Config::from_env()?;
    let now = crate::failure::now_millis();
    let Command::Dlq(command) = cli.command;
    match command {
        Dlq::List {
            dlq,
            kind,
            since,
            json,
        } => {
            let filter = Filter {
                kinds: kind,
                since: time_arg("since", since.as_ref(), now)?,
                ..Filter::default()
            };
            let letters = super::list(&config, &dlq, &filter).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&letters).unwrap_or_default()
                );
            } else {
                print!("{}", super::table(&letters, now));
                let kinds: Vec<String> = super::count_by_kind(&letters)
                    .into_iter()
                    .map(|(k, n)| format!("{k}: {n}"))
                    .collect();
                println!(
                    "{} dead letter(s) in {dlq} ({})",
                    letters.len(),
                    kinds.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Dlq::Show { dlq, message_id } => match super::show(&config, &dlq, &message_id).await? {
            Some(doc) => {
                println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("no dead letter with message_id {message_id} in {dlq}");
                Ok(ExitCode::FAILURE)
            }
        },
        Dlq::Replay {
            dlq,
            id,
            kind,
            since,
            limit,
            to,
            dry_run,
            max_replays,
            json,
        } => {
            let to = match to {
                None => None,
                Some(t) => match t.split_once(':') {
                    Some((e, k)) => Some((e.to_owned(), k.to_owned())),
                    None => {
                        return Err(Error::Config(format!(
                            "--to {t}: expected EXCHANGE:ROUTING_KEY (`:queue` for the default exchange)"
                        )));
                    }
                },
            };
            let options = ReplayOptions {
                filter: Filter {
                    ids: id,
                    kinds: kind,
                    since: time_arg("since", since.as_ref(), now)?,
                    before: None,
                },
                limit,
                to,
                dry_run,
                max_replays,
            };
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {elapsed} replayed {pos} ({per_sec}) {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            let summary = super::replay(&config, &dlq, &options, |s| {
                bar.set_position(s.replayed);
                bar.set_message(format!("seen {}", s.seen));
            })
            .await?;
            bar.finish_and_clear();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&summary).unwrap_or_default()
                );
            } else {
                print_summary(&dlq, &summary, dry_run, max_replays);
            }
            Ok(if summary.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Dlq::Purge {
            dlq,
            kind,
            id,
            before,
            yes,
        } => {
            if !yes {
                return Err(Error::Config(format!(
                    "purge deletes dead letters for good: add --yes to purge {dlq}"
                )));
            }
            let filter = Filter {
                ids: id,
                kinds: kind,
                since: None,
                before: time_arg("before", before.as_ref(), now)?,
            };
            let purged = super::purge(&config, &dlq, &filter).await?;
            println!("purged {purged} dead letter(s) from {dlq}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_summary(dlq: &str, s: &ReplaySummary, dry_run: bool, max_replays: i64) {
    if dry_run {
        println!(
            "dry run on {dlq}: {} seen, {} matched, {} would be replayed",
            s.seen, s.matched, s.would_replay
        );
    } else {
        println!(
            "{dlq}: {} seen, {} matched, {} replayed",
            s.seen, s.matched, s.replayed
        );
    }
    if s.refused_replay_limit > 0 {
        println!(
            "  {} left in the DLQ: already replayed {max_replays} times (--max-replays)",
            s.refused_replay_limit
        );
    }
    if s.no_origin > 0 {
        println!(
            "  {} left in the DLQ: no x-original-exchange/routing-key (use --to)",
            s.no_origin
        );
    }
    if s.failed > 0 {
        println!(
            "  {} left in the DLQ: republish failed ({})",
            s.failed,
            s.first_error.as_deref().unwrap_or("?")
        );
    }
}
