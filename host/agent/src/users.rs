//! Names of users and groups, from the runner's own `/etc/passwd` and `/etc/group`.

use std::collections::HashMap;

/// Id → name maps read once per listing.
pub(crate) struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    /// Reads the runner's account files (missing files give numeric names).
    pub(crate) fn load() -> Self {
        Self {
            users: parse(&std::fs::read_to_string("/etc/passwd").unwrap_or_default()),
            groups: parse(&std::fs::read_to_string("/etc/group").unwrap_or_default()),
        }
    }

    /// The user's name, or its number.
    pub(crate) fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    /// The group's name, or its number.
    pub(crate) fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}

/// `name:x:id:...` lines → id → name (the first name of an id wins, as with `getpwuid`).
fn parse(text: &str) -> HashMap<u32, String> {
    let mut map = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split(':');
        let (Some(name), Some(_), Some(id)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if let Ok(id) = id.parse() {
            map.entry(id).or_insert_with(|| name.to_string());
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_name_of_an_id_wins_and_junk_is_skipped() {
        let map = parse("root:x:0:0::/root:/bin/sh\nbad line\ntoor:x:0:0::/:/bin/sh\nuser:x:1000:1000::/w:/bin/bash\n");
        assert_eq!(map.get(&0).map(String::as_str), Some("root"));
        assert_eq!(map.get(&1000).map(String::as_str), Some("user"));
        assert_eq!(map.len(), 2);
    }
}
