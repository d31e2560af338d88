"""The artifact store's backends behind one interface (`base.ArtifactStore`); `cloud.store`
is the public import and documents them."""
