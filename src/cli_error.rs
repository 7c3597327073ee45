//! Turning a clap error into the one-line message our binaries print.

/// What to do with a clap parse error.
pub enum ClapOutcome {
    /// `--help` or `--version`: clap's text was printed, exit 0.
    Printed,
    /// A usage error, as one line without clap's `error: ` prefix.
    Error(String),
}

/// Prints help and version text as clap does; turns anything else into a single line.
pub fn handle_clap_error(e: clap::Error) -> ClapOutcome {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // Nothing sensible to do if stdout is gone.
            let _ = e.print();
            ClapOutcome::Printed
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            ClapOutcome::Error("no command given (see --help)".to_string())
        }
        _ => {
            let text = e.render().to_string();
            // The message is the first paragraph; usage and tips follow a blank line.
            let paragraph = text.split("\n\n").next().unwrap_or_default();
            let joined = paragraph
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            let first = joined.strip_prefix("error: ").unwrap_or(&joined);
            let first = if first.is_empty() {
                "invalid arguments"
            } else {
                first
            };
            ClapOutcome::Error(format!("{first} (see --help)"))
        }
    }
}

/// Formats an error and its causes on one line, `: ` separated.
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace(['\r', '\n'], " ")
}
