//! Balloon.
