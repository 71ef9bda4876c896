//! Model graphs on the CPU backend, each mirroring the original module paths.
