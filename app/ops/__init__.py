"""Operating a stack: the fleet-wide metrics target, Flower, the dead-letter queue's tools,
and starting RabbitMQ and Redis when they are installed but down."""
