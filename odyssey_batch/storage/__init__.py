"""Where files live: a local folder or an S3/MinIO bucket prefix, behind one small interface."""

from odyssey_batch.storage.location import Location, StoredFile, open_location

__all__ = ["Location", "StoredFile", "open_location"]
