"""Thin command-line faces of the package (argument parsing, messages, exit codes)."""
