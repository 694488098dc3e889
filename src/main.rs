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
mod logging;
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
    // Panic messages go to stderr (never stdout); the runtime gets a CNI error.
    let outcome = std::panic::catch_unwind(|| run(&command))
        .unwrap_or_else(|_| Err((Error::new(code::INTERNAL, "internal error: the plugin panicked; see stderr"), None)));
    let code = match outcome {
        Ok(Some(result)) => {
            cni::write_stdout(&result);
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err((err, version)) => {
            let version = version.filter(|v| cni::is_supported(v)).unwrap_or_else(|| cni::LATEST_VERSION.to_string());
            log::error!("{command} failed: {err}");
            eprintln!("bridge-nat: {command} failed: {err}");
            cni::write_stdout(&cni::error_json(&err, &version));
            ExitCode::FAILURE
        }
    };
    netlink::nfnetlink::release();
    code
}

/// Ok(Some) is printed as the result; errors carry the cniVersion to answer in, when known.
fn run(command: &str) -> std::result::Result<Option<serde_json::Value>, (Error, Option<String>)> {
    let cmd = Command::parse(command).map_err(|e| (e, None))?;
    let mut stdin = Vec::new();
    std::io::stdin().read_to_end(&mut stdin).map_err(|e| (Error::io("read network config from stdin", e), None))?;
    if cmd == Command::Version {
        let requested: Option<String> = serde_json::from_slice::<serde_json::Value>(&stdin)
            .ok()
            .and_then(|v| v.get("cniVersion").and_then(|v| v.as_str()).map(str::to_string));
        return Ok(Some(cni::version_info(requested.as_deref())));
    }
    let draft = config::decode(&stdin).map_err(|e| (e, None))?;
    let version = draft.cni_version().to_string();
    let fail = |e: Error| (e, Some(version.clone()));
    cni::check_version(cmd, &version).map_err(fail)?;
    let env = cni::Env::read(cmd, |k| std::env::var(k).ok()).map_err(fail)?;
    let settings = draft.settings().map_err(fail)?;
    let who = match env.container_id.as_str() {
        "" => draft.network_name().to_string(),
        cid => format!("{}/{cid}/{}", draft.network_name(), env.ifname),
    };
    logging::init(&settings.log_file, settings.log_level, &format!("{} {who}: ", cmd.name()));
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
/// field was edited): the record says what to remove, so only the settings are needed.
fn del_tolerating_config(draft: config::NetConfDraft, env: &cni::Env) -> Result<()> {
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
