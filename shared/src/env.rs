//! Environment variables set to the empty string count as unset.
//!
//! Compose files pass `NAME: ${NAME:-}` for optional settings, so an unset variable arrives
//! as `""`; clap would parse that as a value and fail with `invalid value ''`.

use clap::Command;

/// `command` with every argument whose variable is set but empty no longer reading it, in
/// subcommands too, so the argument falls back to its default or stays absent.
pub fn empty_is_unset(command: Command) -> Command {
    command
        .mut_args(|arg| {
            let empty = arg
                .get_env()
                .and_then(std::env::var_os)
                .is_some_and(|value| value.is_empty());
            if empty {
                arg.env(None::<&'static str>)
            } else {
                arg
            }
        })
        .mut_subcommands(empty_is_unset)
}
