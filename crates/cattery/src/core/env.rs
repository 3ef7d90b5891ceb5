//! Environment variables of instances: which names an agent's `env` and a secret key may take
//! (one definition, used by `core::agents`, `core::secrets` and the secret injection).
//!
//! The platform sets [`PLATFORM_VARS`] for every instance (docs/instance-contract.md); nothing
//! else may set them. The whole [`PLATFORM_PREFIX`] is also refused for secret keys (a set can
//! be bound by many agents, and future platform variables must not be shadowed by a stored
//! value); an agent's own `env` may use other `CATTERY_*` names (to tag its processes, for
//! instance), because it is written with the deployment, not shared.

/// Variables the platform sets for every instance.
pub const PLATFORM_VARS: &[&str] = &[
    "PORT",
    "TMPDIR",
    "CATTERY_INSTANCE_ID",
    "CATTERY_SESSION_ID",
    "CATTERY_BOT_DIR",
    "CATTERY_EXIT_STATUS_FILE",
];

/// Prefix of the platform's variables.
pub const PLATFORM_PREFIX: &str = "CATTERY_";

/// A valid variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_name(k: &str) -> bool {
    !k.is_empty()
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Whether the platform sets `k` for every instance (an agent's `env` may not).
pub fn is_platform_var(k: &str) -> bool {
    PLATFORM_VARS.contains(&k)
}

/// Whether a secret key may not take the name `k`: a platform variable or any `CATTERY_*`.
pub fn reserved_for_secrets(k: &str) -> bool {
    is_platform_var(k) || k.starts_with(PLATFORM_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("API_KEY") && valid_name("_x1"));
        assert!(!valid_name("") && !valid_name("1BAD") && !valid_name("A-B"));
        assert!(!valid_name("A\0B") && !valid_name("A=B"));
    }

    #[test]
    fn reserved() {
        for v in PLATFORM_VARS {
            assert!(is_platform_var(v) && reserved_for_secrets(v), "{v}");
        }
        assert!(!is_platform_var("PORTS") && !reserved_for_secrets("PORTS"));
        assert!(!is_platform_var("CATTERY_TEST_TAG"));
        assert!(reserved_for_secrets("CATTERY_TEST_TAG"));
    }
}
