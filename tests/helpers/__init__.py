"""What tests share: builders, servers, deployments and process helpers (imported from here, not
from other test modules or conftest)."""
