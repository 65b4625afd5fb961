"""Builders used only by tests and benchmarks (tiny random-weight models); not part of zegkit."""
