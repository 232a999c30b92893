"""`python -m integrations.assets [weights|demo|all]` (make setup runs it)."""
from integrations.assets import main

main()
