"""The datastore side of the server: uploads checked before they are stored, stored atomically, never overwritten."""
