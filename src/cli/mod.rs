//! The operator's face: the same binary run by a person (or a unit file) with a subcommand instead
//! of a runtime's `CNI_COMMAND`. Readable text by default, JSON with `--json`; exit 0 when all is
//! well, 1 when the node is not right, 2 for a usage mistake.

mod list;
mod node;
mod options;
mod uninstall;

pub use options::Options;

use std::process::ExitCode;

/// One line each, as `help` prints them.
const SUBCOMMANDS: &[(&str, &str)] = &[
    ("check", "verify every attachment on the node against its record; list the problems"),
    ("reconcile", "repair the node: make the kernel equal to what the records say, once"),
    ("watch", "node agent: reconcile at start and whenever links, addresses, routes, rules or the firewall change"),
    ("list", "every attachment on the node: forwards, the uplink replies leave by, marks, tables, status"),
    ("uninstall", "remove everything bridge-nat put on the node (without --yes: only say what)"),
    ("help", "this text"),
    ("version", "the version and the CNI versions supported (also --version)"),
];

pub fn usage() -> String {
    let mut out = format!(
        "bridge-nat {} - chained CNI plugin (run by a CNI runtime with CNI_COMMAND set) and its node tools\n\n\
         usage: bridge-nat <command> [--state-dir DIR] [--log-file FILE] [--iptables TOOL] [--json] [--yes]\n\ncommands:\n",
        env!("CARGO_PKG_VERSION")
    );
    for (name, what) in SUBCOMMANDS {
        out.push_str(&format!("  {name:<10} {what}\n"));
    }
    out.push_str(&format!("\n{}\n", options::HELP));
    out
}

/// Run a subcommand given on the command line (not a CNI call).
pub fn run(args: &[String]) -> ExitCode {
    let Some((name, rest)) = args.split_first() else {
        eprintln!("{}", crate::cni::about());
        return ExitCode::SUCCESS;
    };
    let known = |n: &str| SUBCOMMANDS.iter().any(|(s, _)| *s == n);
    match name.as_str() {
        "help" | "--help" | "-h" => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        "version" | "--version" | "-V" => {
            println!("{}", crate::cni::about());
            return ExitCode::SUCCESS;
        }
        n if !known(n) => {
            eprintln!("bridge-nat: unknown command {n:?}\n\n{}", usage());
            return ExitCode::from(2);
        }
        _ => {}
    }
    let opts = match Options::parse(rest) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bridge-nat {name}: {e}\n\n{}", usage());
            return ExitCode::from(2);
        }
    };
    crate::logging::init(&opts.settings.log_file, opts.settings.log_level, &format!("{name}: "));
    crate::logging::echo_to_stderr(opts.echo_log);
    let outcome = match name.as_str() {
        "check" => node::check(&opts),
        "reconcile" => node::reconcile(&opts),
        "watch" => crate::agent::watch(&opts.watch_options()),
        "list" => list::list(&opts),
        "uninstall" => uninstall::uninstall(&opts),
        _ => unreachable!("every known subcommand is dispatched"),
    };
    crate::netlink::nfnetlink::release();
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bridge-nat {name}: {e}");
            ExitCode::from(1)
        }
    }
}
