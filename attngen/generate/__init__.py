"""How kernels are made: YAML specs read and expanded, variant packages rendered from the
templates with their test cases, compiled ahead of time, and written atomically into a build
directory with its manifest."""
