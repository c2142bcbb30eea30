"""Jobs and notifications in SQL (sqlmodel), images in an object store (MinIO/S3 or a folder)."""
