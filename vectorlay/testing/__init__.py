"""Helpers shared by tests and benchmarks: process harnesses, fakes and factories."""
