//! The environment of an execution that inherits the agent's own (a container's agent has the
//! image's environment, as `docker exec` would give a process).

use poseidon_agent_protocol::Identity;

/// The agent's environment with `extra` on top; for `user`, `HOME`, `USER` and `LOGNAME` follow
/// the runner's account of `user` (as `setuser user` sets them), when it has one.
pub(crate) fn inherited(extra: Vec<(String, String)>, identity: Identity) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    if identity == Identity::User {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        if let Some(home) = home_of(&passwd, crate::USER_ID) {
            set(&mut env, "HOME", home);
            for key in ["USER", "LOGNAME"] {
                set(&mut env, key, "user".into());
            }
        }
    }
    for (key, value) in extra {
        set(&mut env, &key, value);
    }
    env
}

/// Completes an execution's environment with what a container's exec would give it, where
/// the backend and the request left it out: `TERM=xterm` on a terminal (as `docker exec -t`
/// sets it: `clear`, `tput` and curses need it), and `USER`/`LOGNAME` for `user` (as
/// `setuser user` sets them).
pub(crate) fn complete(env: &mut Vec<(String, String)>, identity: Identity, tty: bool) {
    let mut default = |key: &str, value: &str| {
        if !env.iter().any(|(k, _)| k == key) {
            env.push((key.to_string(), value.to_string()));
        }
    };
    if tty {
        default("TERM", "xterm");
    }
    if identity == Identity::User {
        default("USER", "user");
        default("LOGNAME", "user");
    }
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: String) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value,
        None => env.push((key.to_string(), value)),
    }
}

/// The home directory of the account with this uid in a `passwd` file.
fn home_of(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 6 && fields[2].parse() == Ok(uid)).then(|| fields[5].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_comes_from_the_account_with_the_uid() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/sh\n";
        assert_eq!(home_of(passwd, 1000).as_deref(), Some("/home/user"));
        assert_eq!(home_of(passwd, 1001), None);
        assert_eq!(home_of("broken", 1000), None);
    }

    #[test]
    fn extra_variables_override_inherited_ones() {
        let env = inherited(vec![("PATH".into(), "/x".into())], Identity::Root);
        assert_eq!(
            env.iter().filter(|(k, _)| k == "PATH").collect::<Vec<_>>(),
            vec![&("PATH".to_string(), "/x".to_string())]
        );
    }

    #[test]
    fn a_terminal_gets_a_term_and_user_a_name_unless_given() {
        let mut env = vec![("TERM".to_string(), "vt100".to_string())];
        complete(&mut env, Identity::User, true);
        let get = |env: &[(String, String)], k: &str| {
            env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
        };
        assert_eq!(get(&env, "TERM").as_deref(), Some("vt100"));
        assert_eq!(get(&env, "USER").as_deref(), Some("user"));
        assert_eq!(get(&env, "LOGNAME").as_deref(), Some("user"));
        let mut env = Vec::new();
        complete(&mut env, Identity::Root, true);
        assert_eq!(env, vec![("TERM".to_string(), "xterm".to_string())]);
        let mut env = Vec::new();
        complete(&mut env, Identity::Root, false);
        assert!(env.is_empty(), "no terminal, no TERM; root gets no USER");
    }
}
