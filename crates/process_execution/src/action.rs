//! Turning a [`Process`] into REAPI `Command` and `Action` messages, and the action digest that
//! is the cache key.
//!
//! Deterministic per the REAPI spec: environment variables sorted by name, output paths sorted
//! (and de-duplicated), platform properties sorted by name then value. The cache namespace goes
//! into `Action.salt`, the field REAPI provides for separating caches. The description and the
//! cache scope are not part of the key.

use hashing::Digest;
use prost::Message;
use reapi::build::bazel::remote::execution::v2 as remexec;

use crate::process::Process;

/// Digest of the empty `Directory` message (the empty input root). Equal to the empty blob's
/// digest, since an empty message encodes to no bytes.
pub fn empty_directory_digest() -> Digest {
    Digest::of_bytes(&remexec::Directory::default().encode_to_vec())
}

/// The REAPI messages for one process.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionMessages {
    /// The Command.
    pub command: remexec::Command,
    /// Its digest.
    pub command_digest: Digest,
    /// The Action (refers to the command and input root by digest).
    pub action: remexec::Action,
    /// Its digest: the cache key.
    pub action_digest: Digest,
}

impl ActionMessages {
    /// The encoded Command, for uploading.
    pub fn command_bytes(&self) -> Vec<u8> {
        self.command.encode_to_vec()
    }

    /// The encoded Action, for uploading.
    pub fn action_bytes(&self) -> Vec<u8> {
        self.action.encode_to_vec()
    }
}

/// Builds the Command, the Action and the action digest for `process`.
///
/// ```
/// use process_execution::{Process, action::make_action};
/// let a = make_action(&Process::new(["/bin/echo", "hi"]).env("B", "2").env("A", "1"));
/// let b = make_action(&Process::new(["/bin/echo", "hi"]).env("A", "1").env("B", "2"));
/// assert_eq!(a.action_digest, b.action_digest);
/// assert_eq!(a.command.environment_variables[0].name, "A");
/// ```
// `output_files`/`output_directories` (REAPI v2.0) and `Command.platform` are deprecated in later
// minor versions in favour of `output_paths` and `Action.platform`, but every server still reads
// them, and recache's action digest must stay stable across servers: we fill the v2.0 fields
// and also `Action.platform`.
#[allow(deprecated)]
pub fn make_action(process: &Process) -> ActionMessages {
    let mut output_files = process.output_files.clone();
    output_files.sort();
    output_files.dedup();
    let mut output_directories = process.output_directories.clone();
    output_directories.sort();
    output_directories.dedup();
    let mut properties: Vec<remexec::platform::Property> = process
        .platform_properties
        .iter()
        .map(|(name, value)| remexec::platform::Property {
            name: name.clone(),
            value: value.clone(),
        })
        .collect();
    properties.sort_by(|a, b| (&a.name, &a.value).cmp(&(&b.name, &b.value)));
    let platform = (!properties.is_empty()).then_some(remexec::Platform { properties });

    let command = remexec::Command {
        arguments: process.argv.clone(),
        // BTreeMap iterates in name order: sorted as the spec requires.
        environment_variables: process
            .env
            .iter()
            .map(|(name, value)| remexec::command::EnvironmentVariable {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        output_files,
        output_directories,
        platform: platform.clone(),
        working_directory: process.working_directory.clone(),
        ..Default::default()
    };
    let command_digest = Digest::of_bytes(&command.encode_to_vec());
    let action = remexec::Action {
        command_digest: Some(command_digest.into()),
        input_root_digest: Some(process.input_root.into()),
        timeout: process.timeout.map(|t| reapi::google::protobuf::Duration {
            seconds: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            nanos: t.subsec_nanos() as i32,
        }),
        do_not_cache: false,
        salt: process.cache_namespace.as_bytes().to_vec(),
        platform,
    };
    let action_digest = Digest::of_bytes(&action.encode_to_vec());
    ActionMessages {
        command,
        command_digest,
        action,
        action_digest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Protobuf wire format by hand: a length-delimited field.
    fn ld(field: u8, bytes: &[u8]) -> Vec<u8> {
        assert!(
            bytes.len() < 128,
            "single-byte lengths only in these vectors"
        );
        let mut v = vec![(field << 3) | 2, bytes.len() as u8];
        v.extend_from_slice(bytes);
        v
    }

    /// A varint field (values < 128 only in these vectors).
    fn varint(field: u8, value: u8) -> Vec<u8> {
        assert!(value < 128);
        vec![field << 3, value]
    }

    fn digest_msg(d: Digest) -> Vec<u8> {
        let mut v = ld(1, d.hash.to_hex().as_bytes());
        if d.size_bytes > 0 {
            v.extend(varint(2, d.size_bytes as u8));
        }
        v
    }

    #[test]
    fn golden_digest_of_a_bare_command_computed_from_the_spec() {
        // Command { arguments: ["/bin/echo", "hi"] }:
        //   field 1 (arguments, repeated string) twice.
        let mut command = ld(1, b"/bin/echo");
        command.extend(ld(1, b"hi"));
        let command_digest = Digest::of_bytes(&command);
        // Action { command_digest: 1, input_root_digest: 2 (the empty directory) }.
        // The empty Directory encodes to nothing: its digest is the empty blob's; size 0 is the
        // proto3 default and is not written.
        let mut action = ld(1, &digest_msg(command_digest));
        action.extend(ld(2, &digest_msg(hashing::EMPTY_DIGEST)));
        let expected = Digest::of_bytes(&action);

        let got = make_action(&Process::new(["/bin/echo", "hi"]));
        assert_eq!(got.command_digest, command_digest);
        assert_eq!(got.action_digest, expected);
        // And pinned, so an accidental change to encoding shows up as a diff here.
        assert_eq!(
            got.action_digest.to_string(),
            format!("{}/{}", expected.hash, action.len())
        );
    }

    #[test]
    fn golden_digest_with_env_outputs_platform_timeout_and_salt() {
        let input = Digest::of_bytes(b"pretend input root");
        let process = Process {
            argv: vec!["cc".into()],
            env: [("PATH", "/bin"), ("A", "1")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            working_directory: "src".into(),
            input_root: input,
            output_files: vec!["b.o".into(), "a.o".into()],
            output_directories: vec!["gen".into()],
            timeout: Some(Duration::from_secs(30)),
            description: "not part of the key".into(),
            platform_properties: vec![("OSFamily".into(), "linux".into())],
            cache_scope: crate::CacheScope::Always,
            cache_namespace: "ns1".into(),
        };
        // Command fields in field-number order, as protobuf encoders emit them:
        // 1 arguments, 2 env (sorted: A before PATH), 3 output_files (sorted),
        // 4 output_directories, 5 platform, 6 working_directory.
        let env = |n: &[u8], v: &[u8]| {
            let mut m = ld(1, n);
            m.extend(ld(2, v));
            ld(2, &m)
        };
        let mut property = ld(1, b"OSFamily");
        property.extend(ld(2, b"linux"));
        let platform = ld(1, &property);
        let mut command = ld(1, b"cc");
        command.extend(env(b"A", b"1"));
        command.extend(env(b"PATH", b"/bin"));
        command.extend(ld(3, b"a.o"));
        command.extend(ld(3, b"b.o"));
        command.extend(ld(4, b"gen"));
        command.extend(ld(5, &platform));
        command.extend(ld(6, b"src"));
        let command_digest = Digest::of_bytes(&command);
        // Action: 1 command, 2 input root, 6 timeout (Duration{seconds: 30}), 9 salt, 10 platform.
        let mut action = ld(1, &digest_msg(command_digest));
        let mut input_msg = ld(1, input.hash.to_hex().as_bytes());
        input_msg.extend(varint(2, input.size_bytes as u8));
        action.extend(ld(2, &input_msg));
        action.extend(ld(6, &varint(1, 30)));
        action.extend(ld(9, b"ns1"));
        action.extend(ld(10, &platform));
        let expected = Digest::of_bytes(&action);

        let got = make_action(&process);
        assert_eq!(got.command_digest, command_digest);
        assert_eq!(got.action_digest, expected);
    }

    #[test]
    fn every_meaningful_change_changes_the_digest() {
        let base = Process::new(["tool", "--flag"])
            .env("K", "v")
            .output_files(["out"])
            .timeout(Duration::from_secs(10));
        let key = |p: &Process| make_action(p).action_digest;
        let k0 = key(&base);
        let variants: Vec<Process> = vec![
            Process {
                argv: vec!["tool".into()],
                ..base.clone()
            },
            base.clone().env("K", "w"),
            base.clone().env("K2", "v"),
            base.clone().output_files(["out2"]),
            base.clone().output_directories(["d"]),
            base.clone().timeout(Duration::from_secs(11)),
            base.clone().input_root(Digest::of_bytes(b"x")),
            Process {
                working_directory: "sub".into(),
                ..base.clone()
            },
            Process {
                platform_properties: vec![("a".into(), "b".into())],
                ..base.clone()
            },
            Process {
                cache_namespace: "other".into(),
                ..base.clone()
            },
        ];
        let mut seen = std::collections::HashSet::from([k0]);
        for v in &variants {
            assert!(seen.insert(key(v)), "{v:?} collided");
        }
        // Not part of the key: description, cache scope, and output order.
        let same = [
            Process {
                description: "x".into(),
                ..base.clone()
            },
            Process {
                cache_scope: crate::CacheScope::Never,
                ..base.clone()
            },
        ];
        for s in &same {
            assert_eq!(key(s), k0);
        }
        let a = base.clone().output_files(["x", "y"]);
        let b = base.clone().output_files(["y", "x", "x"]);
        assert_eq!(key(&a), key(&b));
    }
}
