//! mfn-data
