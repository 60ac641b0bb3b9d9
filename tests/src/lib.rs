//! Test support: building and driving guests.
