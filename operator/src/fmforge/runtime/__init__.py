"""Where stages run: in-process locally (`local`), with a state store (`state`) and progress
output (`progress`); as the entrypoint of a RayJob (`job`), reporting progress and results into
the object's status (`report`)."""
