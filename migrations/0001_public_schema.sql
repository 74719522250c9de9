-- The dashboard's tables, exactly as its Drizzle schema (shared/schema.ts, see
-- tests/fixtures/seed_schema.md) declares them, written the way drizzle-kit
-- generates them. The dashboard keeps running `drizzle-kit push` against this
-- database, so NOTHING else may be added to "public" (no index, constraint,
-- column, trigger, function or type): anything the worker needs lives in its
-- own schema. tests/schema_catalog.rs compares the resulting catalog with the
-- seed's Drizzle code.
--
-- Every object is qualified with "public" because sqlx runs the migrations with
-- search_path set to the worker's own schema (so `_sqlx_migrations` lands there).

CREATE TYPE "public"."call_status" AS ENUM('completed', 'in-progress', 'missed', 'transferred');--> statement-breakpoint
CREATE TYPE "public"."booking_status" AS ENUM('upcoming', 'completed', 'canceled');--> statement-breakpoint
CREATE TYPE "public"."subscription_plan" AS ENUM('free', 'basic', 'premium', 'enterprise');--> statement-breakpoint
CREATE TABLE "public"."users" (
	"id" serial PRIMARY KEY NOT NULL,
	"username" varchar(255) NOT NULL,
	"email" varchar(255) NOT NULL,
	"password" varchar(255) NOT NULL,
	"businessName" varchar(255),
	"created_at" timestamp DEFAULT now() NOT NULL,
	CONSTRAINT "users_username_unique" UNIQUE("username"),
	CONSTRAINT "users_email_unique" UNIQUE("email")
);
--> statement-breakpoint
CREATE TABLE "public"."businesses" (
	"id" serial PRIMARY KEY NOT NULL,
	"user_id" integer NOT NULL,
	"business_name" varchar(255) NOT NULL,
	"description" text,
	"address" varchar(255),
	"city" varchar(100),
	"state" varchar(100),
	"zip" varchar(20),
	"phone" varchar(20),
	"email" varchar(255) NOT NULL,
	"website" varchar(255),
	"created_at" timestamp DEFAULT now() NOT NULL,
	"updated_at" timestamp DEFAULT now() NOT NULL
);
--> statement-breakpoint
CREATE TABLE "public"."hours_of_operation" (
	"id" serial PRIMARY KEY NOT NULL,
	"business_id" integer NOT NULL,
	"day_of_week" varchar(20) NOT NULL,
	"open_time" varchar(20),
	"close_time" varchar(20),
	"is_open" boolean DEFAULT true NOT NULL
);
--> statement-breakpoint
CREATE TABLE "public"."faqs" (
	"id" serial PRIMARY KEY NOT NULL,
	"business_id" integer NOT NULL,
	"question" text NOT NULL,
	"answer" text NOT NULL
);
--> statement-breakpoint
CREATE TABLE "public"."calls" (
	"id" serial PRIMARY KEY NOT NULL,
	"business_id" integer NOT NULL,
	"caller" varchar(100),
	"phone" varchar(20),
	"type" varchar(50),
	"start_time" timestamp DEFAULT now() NOT NULL,
	"end_time" timestamp,
	"status" "public"."call_status" NOT NULL,
	"duration" varchar(20),
	"recording" text,
	"transcript" text
);
--> statement-breakpoint
CREATE TABLE "public"."bookings" (
	"id" serial PRIMARY KEY NOT NULL,
	"business_id" integer NOT NULL,
	"customer" varchar(100) NOT NULL,
	"phone" varchar(20),
	"email" varchar(255),
	"service" varchar(100) NOT NULL,
	"date" timestamp NOT NULL,
	"status" "public"."booking_status" NOT NULL,
	"notes" text,
	"created_at" timestamp DEFAULT now() NOT NULL
);
--> statement-breakpoint
CREATE TABLE "public"."integrations" (
	"id" serial PRIMARY KEY NOT NULL,
	"business_id" integer NOT NULL,
	"type" varchar(50) NOT NULL,
	"config" jsonb NOT NULL,
	"status" varchar(20) NOT NULL,
	"created_at" timestamp DEFAULT now() NOT NULL,
	"updated_at" timestamp DEFAULT now() NOT NULL
);
--> statement-breakpoint
CREATE TABLE "public"."subscriptions" (
	"id" serial PRIMARY KEY NOT NULL,
	"user_id" integer NOT NULL,
	"plan" "public"."subscription_plan" NOT NULL,
	"stripe_customer_id" varchar(100),
	"stripe_subscription_id" varchar(100),
	"status" varchar(20) NOT NULL,
	"current_period_start" timestamp,
	"current_period_end" timestamp,
	"created_at" timestamp DEFAULT now() NOT NULL,
	"updated_at" timestamp DEFAULT now() NOT NULL
);
--> statement-breakpoint
ALTER TABLE "public"."businesses" ADD CONSTRAINT "businesses_user_id_users_id_fk" FOREIGN KEY ("user_id") REFERENCES "public"."users"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "public"."hours_of_operation" ADD CONSTRAINT "hours_of_operation_business_id_businesses_id_fk" FOREIGN KEY ("business_id") REFERENCES "public"."businesses"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "public"."faqs" ADD CONSTRAINT "faqs_business_id_businesses_id_fk" FOREIGN KEY ("business_id") REFERENCES "public"."businesses"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "public"."calls" ADD CONSTRAINT "calls_business_id_businesses_id_fk" FOREIGN KEY ("business_id") REFERENCES "public"."businesses"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "public"."bookings" ADD CONSTRAINT "bookings_business_id_businesses_id_fk" FOREIGN KEY ("business_id") REFERENCES "public"."businesses"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "public"."integrations" ADD CONSTRAINT "integrations_business_id_businesses_id_fk" FOREIGN KEY ("business_id") REFERENCES "public"."businesses"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "public"."subscriptions" ADD CONSTRAINT "subscriptions_user_id_users_id_fk" FOREIGN KEY ("user_id") REFERENCES "public"."users"("id") ON DELETE no action ON UPDATE no action;
