//! PCI (todo)
