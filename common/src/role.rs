//! The four roles of a PPO job besides the reference (the policy's base with
//! adapters off): what the adapters on a shared base are named after, what
//! `[placement]` spreads over workers, and what role calls address.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The trainable policy adapter (also what SFT trains).
    Policy,
    /// The reward model's adapter and head.
    Reward,
    /// The critic's adapter and value head.
    Critic,
    /// Generation with a copy of the policy adapter, on its own worker.
    Rollout,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Policy, Role::Reward, Role::Critic, Role::Rollout];

    /// The lowercase name: the adapter's name on a base, the checkpoint
    /// subdirectory, the proto name without its `ROLE_` prefix.
    pub const fn name(self) -> &'static str {
        match self {
            Role::Policy => "policy",
            Role::Reward => "reward",
            Role::Critic => "critic",
            Role::Rollout => "rollout",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::Role;

    #[test]
    fn names_round_trip() {
        for r in Role::ALL {
            assert_eq!(Role::from_name(r.name()), Some(r));
        }
        assert_eq!(Role::from_name("reference"), None);
    }
}
