//! vm-migration
