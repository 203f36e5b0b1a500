"""Plugin roles (typed protocols), hook specifications and discovery."""
