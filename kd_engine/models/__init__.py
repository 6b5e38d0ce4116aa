"""Teacher loading, student builders."""
