//! bridge-nat: a chained CNI plugin that forwards host ports to pods on a Linux bridge,
//! masquerades their traffic and routes replies out of the uplink they came in on.

mod agent;
mod backend;
mod cli;
mod cni;
mod commands;
mod config;
mod crashpoint;
mod error;
mod family;
mod health;
mod logging;
mod metrics;
mod netlink;
mod plan;
mod routing;
mod state;

use cni::Command;
use error::{code, Error, Result};
use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(command) = std::env::var("CNI_COMMAND").ok().filter(|c| !c.is_empty()) else {
        // A person at a shell or a unit file, not a runtime.
        let args: Vec<String> = std::env::args().skip(1).collect();
        return cli::run(&args);
    };
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Err(e) => Err((Error::io("read network config from stdin", e), None)),
        // Panic messages go to stderr (never stdout); the runtime gets a CNI error.
        Ok(_) => std::panic::catch_unwind(|| run(&command, &stdin)).unwrap_or_else(|_| {
            Err((Error::new(code::INTERNAL, "internal error: the plugin panicked; see stderr"), None))
        }),
    };
    let code = match outcome {
        Ok(Some(result)) => {
            cni::write_stdout(&result);
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err((err, version)) => {
            report_failure(&command, &stdin, &err, version);
            ExitCode::FAILURE
        }
    };
    netlink::nfnetlink::release();
    code
}

/// The error goes to stdout for the runtime, to stderr for the runtime's log, and to the plugin's
/// own log file, where operators look: when the call failed before logging was set up (a config
/// that does not decode), the log settings that can still be read are used, else the defaults.
/// The error answers in the config's cniVersion whenever it can be read.
fn report_failure(command: &str, stdin: &[u8], err: &Error, version: Option<String>) {
    let salvaged = (version.is_none() || !logging::is_initialised()).then(|| config::salvage(stdin));
    if let Some(s) = salvaged.as_ref().filter(|_| !logging::is_initialised()) {
        logging::init(&s.settings.log_file, s.settings.log_level, &call_prefix(command, s.name.as_deref()));
    }
    let version = version
        .or_else(|| salvaged.and_then(|s| s.cni_version))
        .filter(|v| cni::is_supported(v))
        .unwrap_or_else(|| cni::LATEST_VERSION.to_string());
    log::error!("{command} failed: {err}");
    eprintln!("bridge-nat: {command} failed: {err}");
    cni::write_stdout(&cni::error_json(err, &version));
}

/// `ADD dind/<container>/net1: ` before every line of a call, from the raw `CNI_*` variables.
fn call_prefix(command: &str, network: Option<&str>) -> String {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let network = network.unwrap_or("?");
    match var("CNI_CONTAINERID").as_str() {
        "" => format!("{command} {network}: "),
        cid => format!("{command} {network}/{cid}/{}: ", var("CNI_IFNAME")),
    }
}

/// Ok(Some) is printed as the result; errors carry the cniVersion to answer in, when known.
fn run(command: &str, stdin: &[u8]) -> std::result::Result<Option<serde_json::Value>, (Error, Option<String>)> {
    let cmd = Command::parse(command).map_err(|e| (e, None))?;
    if cmd == Command::Version {
        let requested: Option<String> = serde_json::from_slice::<serde_json::Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion").and_then(|v| v.as_str()).map(str::to_string));
        return Ok(Some(cni::version_info(requested.as_deref())));
    }
    let draft = match config::decode(stdin) {
        Ok(draft) => draft,
        Err(e) if cmd == Command::Del => return del_salvaged(stdin, e).map(|()| None),
        Err(e) => return Err((e, None)),
    };
    let version = draft.cni_version().to_string();
    let fail = |e: Error| (e, Some(version.clone()));
    cni::check_version(cmd, &version).map_err(fail)?;
    let env = cni::Env::read(cmd, |k| std::env::var(k).ok()).map_err(fail)?;
    let settings = draft.settings().map_err(fail)?;
    logging::init(&settings.log_file, settings.log_level, &call_prefix(cmd.name(), Some(draft.network_name())));
    for w in draft.warnings() {
        log::warn!("{w}");
    }
    dispatch(cmd, draft, &env).map_err(fail)
}

fn dispatch(cmd: Command, draft: config::NetConfDraft, env: &cni::Env) -> Result<Option<serde_json::Value>> {
    match cmd {
        Command::Add => commands::add(&draft.validate()?, env).map(Some),
        Command::Check => commands::check(&draft.validate()?, env).map(|()| None),
        Command::Del => del_tolerating_config(draft, env).map(|()| None),
        Command::Gc => commands::gc(&draft.validate()?).map(|()| None),
        Command::Status => commands::status(&draft.validate()?).map(|()| None),
        Command::Version => unreachable!("answered before the config is decoded"),
    }
}

/// DEL must still clean up when the config no longer validates (an upgrade tightened a rule, a
/// field was edited, the runtime sent input we cannot use): the record says what to remove, so
/// only the settings are needed.
fn del_tolerating_config(mut draft: config::NetConfDraft, env: &cni::Env) -> Result<()> {
    draft.drop_unusable_runtime_input();
    let network = draft.network_name().to_string();
    let settings = draft.settings()?;
    let conf = match draft.validate() {
        Ok(conf) => conf,
        Err(e) => {
            log::warn!("config does not validate ({e}); deleting from the record alone");
            config::NetConf::for_cleanup(network, settings)?
        }
    };
    commands::del(&conf, env)
}

/// DEL of a config that does not even decode: with the network name and the container id, the
/// record still says what to remove. Without a name there is no record to find.
fn del_salvaged(stdin: &[u8], why: Error) -> std::result::Result<(), (Error, Option<String>)> {
    let salvaged = config::salvage(stdin);
    let version = salvaged.cni_version.clone();
    let Some(network) = salvaged.name.clone() else { return Err((why, version)) };
    let fail = |e: Error| (e, version.clone());
    let env = cni::Env::read(Command::Del, |k| std::env::var(k).ok()).map_err(fail)?;
    logging::init(&salvaged.settings.log_file, salvaged.settings.log_level, &call_prefix("DEL", Some(&network)));
    log::warn!("config does not decode ({why}); deleting from the record alone");
    let conf = config::NetConf::for_cleanup(network, salvaged.settings).map_err(fail)?;
    commands::del(&conf, &env).map_err(fail)
}
