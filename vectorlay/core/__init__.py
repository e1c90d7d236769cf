"""Pure logic: no trio, no sqlalchemy, no sockets, no clock, no environment.

Everything here takes its inputs (including `now`) as arguments and returns values, so it can be
tested with plain functions and hypothesis.
"""
