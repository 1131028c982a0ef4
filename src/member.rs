//! The member's embedding API under its established path: [`Member`] and its configuration,
//! figures and errors, defined in [`crate::engine::member`].

pub use crate::engine::member::{
    group_loss_filter, Member, MemberBuilder, MemberConfig, MemberError, MemberStats,
};
