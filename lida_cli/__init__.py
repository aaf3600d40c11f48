"""The command line: `lida VERB ...` parses every verb and dispatches to the floors below (docs/architecture.md)."""
