"""Where stages run: in-process locally (`local`), with a state store (`state`) and progress
output (`progress`). The RayJob entrypoint joins them when the operator lands."""
