"""The conformance checks: one test per behaviour, numbered as in issue 3."""
