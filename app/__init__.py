"""The Run data layer: models, schemas, database setup, repositories and errors."""
