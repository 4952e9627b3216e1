"""disttrain's config groups, shipped inside the package. Importing this package (Hydra does, for a
search path entry `pkg://disttrain.conf`) registers the schema they start from, `disttrain_schema`, and
the `${run_id:}` resolver their run_dir uses: a user's own `@hydra.main` app composes them as is."""

from disttrain.compose import register_schema
from disttrain.config import register_resolvers

register_schema()
register_resolvers()
