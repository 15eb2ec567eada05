"""Storage code that touches SQL: models, engine setup, schema migrations."""
