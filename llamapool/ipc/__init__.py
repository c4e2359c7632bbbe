"""Router ⇄ worker messaging over ZeroMQ."""
