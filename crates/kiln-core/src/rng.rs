//! Seeded noise.
