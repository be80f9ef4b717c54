module otel_stepspan/search_front

go 1.22
